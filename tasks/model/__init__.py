"""Models: base models and fingerprints, heads, one object per training method, building, loading, memory."""
