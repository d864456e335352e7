module local/reloader-test-pause

go 1.22
