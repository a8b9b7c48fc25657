"""Models: each builds its layers (or stage graph), loss and data set."""
