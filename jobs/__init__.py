"""What users run on trained weights: generate, segment, evaluate, encode a data set, export weights."""
