"""The PyTorch/MONAI peer of bonejax's jobs, and the script that compares the two (compare.py).

torch and monai are imported only by `monai_job.py`; nothing in the bonejax package needs them.
"""
