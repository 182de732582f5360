"""The command line: the launch-script runner and the `bonejax` console command."""
