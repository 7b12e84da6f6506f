"""The process the trainer runs in: ops built at set-up, warnings dropped, the process group, rank supervision,
local ranks without a launcher, progress lines."""
