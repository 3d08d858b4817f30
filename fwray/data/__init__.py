"""Parquet in, token cache out (Ray Data): the inputs, the tokenizing pass, the data report, the data's size."""
