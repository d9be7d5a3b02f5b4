"""The use cases every front end shares: segment one file (`segment_file`) and a folder of them (`batch`)."""
