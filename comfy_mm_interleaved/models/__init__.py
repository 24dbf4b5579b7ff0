"""Model parts of MM-Interleaved, one file per part."""
