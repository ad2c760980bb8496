"""Data sets: the one reader of click and purchase files, the importer, the simulator."""
