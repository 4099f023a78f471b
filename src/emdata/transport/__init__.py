"""Where bytes come from: HTTP (retry policy, verbs, resumable download), S3 and archives."""
