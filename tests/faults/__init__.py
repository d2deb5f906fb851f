"""The fault suite (issue 14): each case breaks something real, then checks the error, what is
preserved and the recovery. Run it alone with ``pytest -m faults``."""
