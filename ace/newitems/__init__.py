"""Items added after training: query tower, hash head, binary index, calibration and merge."""
