"""Business rules as plain functions of their inputs and of `now`. Imports neither grpc nor SQLAlchemy."""
