"""`clipdeploy embed-dataset`: embed a whole dataset into sharded parquet, exactly once, locally or on Ray Data."""
