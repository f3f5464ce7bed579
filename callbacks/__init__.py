"""Lightning callbacks, installed as `compresslight.callbacks`."""
