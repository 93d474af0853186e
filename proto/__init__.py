"""Protocol definitions and their generated Python modules."""
