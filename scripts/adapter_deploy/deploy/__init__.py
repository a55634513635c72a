"""Deploying to endpoints: plan, remote calls, steps per endpoint, fleet runs, records."""
