"""The service layer: the rules of every task, between the routes and the registry."""
