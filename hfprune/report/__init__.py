"""`hfprune report`: one run reader, its tables and plots, and the study (Figure 1, the claims, noise)."""
