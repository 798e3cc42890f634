@echo off
rem A stand-in for the venv's Python under Wine's cmd (THETA_PYTHON points here; the .bat runs it with "call").
rem It appends its command line to %STUB_LOG%. "-m src.utils.overnight plan --out FILE" copies %STUB_PLAN% to FILE
rem and exits with %STUB_PLAN_CODE%; a call with an argument equal to %STUB_FAIL% exits with %STUB_FAIL_CODE%;
rem every other call exits 0.
setlocal DisableDelayedExpansion
>>"%STUB_LOG%" echo.%*
if not "%~2"=="src.utils.overnight" goto scan
if not "%~3"=="plan" exit /b 0
copy /y "%STUB_PLAN%" "%~5" >nul
exit /b %STUB_PLAN_CODE%
:scan
if not defined STUB_FAIL exit /b 0
if "%~1"=="" exit /b 0
if "%~1"=="%STUB_FAIL%" exit /b %STUB_FAIL_CODE%
shift
goto scan
