"""What every command shares: atomic and resumable outputs (`io`), process-group start-up (`distributed`)."""
