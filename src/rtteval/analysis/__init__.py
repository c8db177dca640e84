"""From job records to numbers: metrics and intervals, results.json, report.md, findings."""
