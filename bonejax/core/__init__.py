"""What every stage shares: errors, JSON, progress, atomic outputs and ownership, several processes as one job."""
