"""Conservation harness (issue 13): a real ``amid run`` between the numbering simulator and real
receivers, faults injected, and an oracle that accounts for every event (see oracle.py)."""
