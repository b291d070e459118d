"""The slice of the memory manager KSM plugs into: frames, vmas, page tables, faults, syscalls."""
