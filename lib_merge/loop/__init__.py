"""The experiment loop over a host's loaded model: sweeps (``sweep``), greedy soups (``greedy_soup``),
the X/Y/Z plot's axes (``xyz_axes``), and the runner that merges, generates and scores (``runner``)."""
