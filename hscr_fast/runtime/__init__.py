"""What every command shares, once each: the error base and exit codes (`errors`), flags as dataclasses (`flags`),
atomic outputs (`io`), whether output on disk can be resumed (`resume`), the automatic dtype (`precision`) and
process-group start-up (`distributed`)."""
