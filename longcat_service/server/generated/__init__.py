"""Python code generated from proto/longcat/v1/longcat.proto (see longcat_service/server/codegen.py)."""
