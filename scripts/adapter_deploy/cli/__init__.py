"""One module per script: parse arguments, call `adapter_deploy.api`, render the result."""
