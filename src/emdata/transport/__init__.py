"""Where bytes come from: HTTP and S3, and the archives they arrive in.

HTTP, one job per module, lowest first: ``retry`` (the policy: how often, how long, how slow),
``failures`` (what went wrong, in a few words), ``headers`` (what a response says, read
strictly), ``sink`` (the ``.part`` file: write and hash while receiving), ``download`` (one
verified, resumable file), ``client`` (the session, the retry loop and the verbs; the one name a
source needs). ``header_deadline`` bounds a response's headers; ``s3`` reads a public bucket;
``archive`` extracts tar and zip files safely.
"""
