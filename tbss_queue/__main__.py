from tbss_queue.cli import main

main()
