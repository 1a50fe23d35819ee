"""Generated gRPC code for the rlhf.v1 contract. Do not edit."""
