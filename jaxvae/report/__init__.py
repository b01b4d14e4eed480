"""What a person reads: results files, figures, report.html, the maps `score` writes."""
