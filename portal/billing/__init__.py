"""The billing service layer: pricing, invoices, cycles and sync. Views and jobs call
these functions; they change state and leave the commit to their caller."""
