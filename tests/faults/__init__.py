"""The fault suite (issue 8): real runs with faults injected through DLAUNCH_FAULTS (launcher/faults.py)."""
