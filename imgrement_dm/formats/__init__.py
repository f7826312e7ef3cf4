"""Files and formats for captured streams: capture files, and the peers' formats."""
