"""The paper's experiments as code: matching, sweeps, reports."""
