#!/bin/bash
# Runs the CLI named by $REAL_CLI, appending "user sys elapsed args" to $CPU_LOG.
exec /usr/bin/time -a -o "$CPU_LOG" -f "%U %S %e $2" "$REAL_CLI" "$@"
