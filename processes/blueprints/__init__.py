"""Process blueprints. Importing this package registers every blueprint."""
