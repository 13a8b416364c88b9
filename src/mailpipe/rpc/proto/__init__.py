"""Generated from proto/roadrunner/jobs/v1/jobs.proto by scripts/gen_protos.sh (make protos)."""
