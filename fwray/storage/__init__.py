"""Where fwray keeps the token cache and the runs: a local folder, or object storage (s3://, gs://) through pyarrow.fs.
Pure of Ray and MLflow."""
