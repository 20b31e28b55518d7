"""What every stage leans on: errors and exit codes, the console, atomic writes and hashes, locks, redaction,
memory/disk checks, the platform set-up done before mlx is imported, untrusted-file policy, the cache folder and
the `doctor` report."""
