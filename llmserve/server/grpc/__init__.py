"""gRPC front end: llmserve.proto (package llmserve.v1), its generated stubs, the servicer."""
