"""Building blocks shared by every decoder: norms, attention cores, backend choice."""
