"""Machinery every source shares: the fetch context, the fetch record, file downloads and the
resumable object copy."""
