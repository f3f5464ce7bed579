"""LightningDataModules, installed as `compresslight.datamodules`."""
