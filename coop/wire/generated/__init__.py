"""Code generated from proto/coop.proto by scripts/gen_proto.py. Do not edit; regenerate."""
