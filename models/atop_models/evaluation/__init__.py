"""`atop-eval`: adaptive attacks through the whole defended pipeline, baselines, reports and plots."""
