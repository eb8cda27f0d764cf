"""livefuse student trainer: fetches teacher distributions live, aligns, fuses and trains the target."""
