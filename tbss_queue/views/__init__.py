"""What people see: status and progress in the terminal, the HTML report, throughput, the
command logs and the Flower pages. Reads the queue's state; changes nothing."""
