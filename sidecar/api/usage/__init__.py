"""The usage export (`/v2/usage`): its parameters, groupings, rows and streamed answer."""
