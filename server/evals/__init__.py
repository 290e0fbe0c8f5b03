"""Evaluation endpoints: evals (a data source + graders) and their runs over served variants."""
