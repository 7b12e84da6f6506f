"""Checkpoints: the manager that saves and resumes a run, and the readers that check every file it loads."""
