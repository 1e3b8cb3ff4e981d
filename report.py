"""Render results/*.csv into README.md's marker blocks and results/*.png: the user's command
for the reporting package (reporting/pages.py does the work).

    python report.py                      # README.md and results/*.png
    python report.py --columns            # what each CSV column counts
"""
from reporting.pages import main

if __name__ == "__main__":
    raise SystemExit(main())
